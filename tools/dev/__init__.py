"""Development-only code: the test and benchmark lab, the OCI image builder, the benchmark.

Not listed in pyproject's packages, so it never ships in the wheel; an editable install
(the checkout's .venv) imports it from the source tree."""
