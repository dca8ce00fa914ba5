"""C++ sources of fastpretrain, shipped as package data and built on first use."""
