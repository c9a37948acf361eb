"""Rectified flow: timestep sampling, noising, the velocity loss, and samplers."""
