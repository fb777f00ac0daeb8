"""Token merging (the mitigation) and the forward cost it saves."""
