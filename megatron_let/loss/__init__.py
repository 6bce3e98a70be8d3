"""The alignment loss at layer k and where its work runs: the forward hook, projector, teacher-state
normalisation, slicing to this rank, the teacher-work placement, recompute, the gradient probe and scalars."""
