"""permsparse.models"""
