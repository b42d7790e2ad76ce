"""Test-side scoring, written independently of distill.student.decode so the tests check it."""


def edit_distance(ref, hyp) -> int:
    """Levenshtein distance between two sequences (words or characters), every edit costing 1."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]
