"""finetune_testbed."""
