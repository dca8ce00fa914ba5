"""fastpretrain: weakly supervised image pretraining on hashtags (Mahajan et al. 2018)."""

__version__ = "0.1.0"
