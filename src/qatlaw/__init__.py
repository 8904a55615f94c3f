"""qatlaw: the QAT scaling-law study as a Python package."""
