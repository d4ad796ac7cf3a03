from stages.compose.stage import ComposeStage

__all__ = ["ComposeStage"]
