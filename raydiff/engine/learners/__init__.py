"""Learner side: one learner process, the Ray Train learner group, its coordinator and optimiser steppers."""
