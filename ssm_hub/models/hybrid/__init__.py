"""The hybrid SSM / attention / mixture-of-experts architecture (model_type ``ssm_hub_hybrid``)."""
