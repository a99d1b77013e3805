"""HTTP handlers: thin functions that authenticate, validate, call the request paths
(``router.writes``, ``router.reads``, ``router.saga_step``), map their outcomes to problems
(``router.errors.from_outcome``) and render."""
