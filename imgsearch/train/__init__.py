"""Fine-tuning: configs, inputs, one loop, objectives, losses."""
