"""Training: attention transfer (stage 1), LoRA fine-tuning (stage 2), and the pipeline that runs both."""
