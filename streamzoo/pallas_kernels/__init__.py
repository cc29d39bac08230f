"""streamzoo.pallas_kernels"""
