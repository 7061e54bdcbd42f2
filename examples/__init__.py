"""Example jobs for jobrunner (see examples.jobs); the default allow-list admits examples.*."""
