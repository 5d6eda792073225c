"""Kubeflow Pipelines: components, the DAG, the local runner (`dpoflow run`), compile/submit/schedule."""
