"""learner subpackage."""
