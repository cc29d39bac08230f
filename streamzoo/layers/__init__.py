"""streamzoo.layers"""
