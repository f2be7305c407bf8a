"""coldbrew.fuse"""
