"""Student training: offline distillation from label stores."""
