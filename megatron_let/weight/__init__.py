"""The alignment weight and when LET stops: the lambda schedule, --let-lambda auto, the stop step, --let-stop auto."""
