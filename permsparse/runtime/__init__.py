"""permsparse.runtime"""
