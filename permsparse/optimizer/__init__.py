"""permsparse.optimizer"""
