"""coldbrew.loader"""
