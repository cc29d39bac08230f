"""streamzoo.eval"""
