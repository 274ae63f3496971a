"""liveindex models: phases, master patterns, template dictionaries."""
