"""Kernels the plan may choose: varlen attention (`attention`), the chunked linear cross-entropy
(`cross_entropy`), the lean LoRA forward (`lora`) and Liger's patches (`liger`, CUDA only). Each is exact
against the plain path it replaces, and none knows about stages or backends."""
