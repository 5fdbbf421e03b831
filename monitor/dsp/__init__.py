"""Signal processing: resampling, conditioning and levels, the log-mel front end and how its
Numba kernels are compiled.
"""
