"""The API's multi-step actions, beneath the routes: each takes what the route was given and returns
what it should answer, so a route is its signature and one call."""
