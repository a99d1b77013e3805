"""Contract tests shared by a real implementation and its fake (the Vitess way): each check
here runs against both, so a fake that drifts from what the real thing does fails its own
unit test instead of letting a unit test pass against behaviour nothing real has."""
