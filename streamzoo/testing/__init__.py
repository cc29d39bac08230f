"""streamzoo.testing"""
