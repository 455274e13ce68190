"""ComfyUI entry point, used when this repository is cloned into ComfyUI/custom_nodes/.

ComfyUI imports this file by location under the folder's name; the relative import keeps the package
working under whatever name the folder has. pip users import `interposer.comfy` instead (see README).
"""

from .interposer.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
