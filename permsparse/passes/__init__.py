"""permsparse.passes"""
