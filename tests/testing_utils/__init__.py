"""The shared test harness: tiny models and data (``models``, ``data``), the DeepSpeed worker
(``deepspeed``) and the tester mixins every model and step test class applies
(``model_tester``, ``step_tester``)."""
