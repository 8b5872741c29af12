"""Named numerical tolerances shared by the test-suite (no helpers, only constants)."""

# Element-wise absolute tolerances.
ATOL_FP32 = 1e-5
ATOL_FP64 = 1e-10

# Element-wise relative tolerance for float64 comparisons.
RTOL_FP64 = 1e-10

# Relative error ‖a − b‖ / ‖b‖ allowed between two computations of the same quantity.
REL_FP32 = 1e-5
REL_FP64 = 1e-10

# How far our HOOI error may exceed tensorly's partial_tucker error (tensorly stops at tol=1e-4).
TENSORLY_SLACK = 1e-6

# Full-rank conversion of a whole real network (tests/test_coverage_matrix.py), float32, relative L2 over
# all outputs: exact up to rounding, which 50 layers with random BatchNorm statistics amplify.
REL_FP32_FULL_RANK_MODEL = 1e-4
