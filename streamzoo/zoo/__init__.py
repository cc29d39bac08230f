"""streamzoo.zoo"""
