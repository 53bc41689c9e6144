"""The pass@N evaluation harness: generation backends, estimators, grading orchestration, reports and plots."""
