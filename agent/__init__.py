"""coldbrew.agent"""
