"""finetune_trainer."""
