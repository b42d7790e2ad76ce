"""`python -m cli` == the `ci-store` console script."""
from cli.main import main

main()
