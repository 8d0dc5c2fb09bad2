"""Sweeps: the paper's pair (Table 1) and p_L sweep (Fig. 8), one config after another
(`python -m experiments.sweep`)."""
