"""streamzoo.train"""
