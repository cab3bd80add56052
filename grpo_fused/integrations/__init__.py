"""Drop-in adapters for existing trainers (TRL, verl)."""
