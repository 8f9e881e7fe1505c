"""Training wiring on top of the backend: FSDP2, the e2e trainer, VLM tower lookup and freezing,
and the dummy_forward hook for rank-asymmetric multimodal batches."""
