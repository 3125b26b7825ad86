"""sdproxy: a web-facing proxy for a text-to-image model that keeps the token on the server.

```python
from proxy import Settings, create_app

app = create_app(Settings(model="user/sd-model"))   # or create_app() to read the environment
```
"""

from .app import create_app
from .config import ConfigError, Settings, load_settings

__all__ = ["ConfigError", "Settings", "create_app", "load_settings"]
