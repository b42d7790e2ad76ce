"""The ML side of ci-store: MVQ codec, teachers, extraction job, data loading, student transducer, losses, training and evaluation."""
