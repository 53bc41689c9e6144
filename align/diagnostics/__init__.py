"""Observers of training (gradient entanglement, attention entropy); they never change the update unless asked."""
