"""A small OAuth2 authorization server on authlib (not keygate's code): the real
RFC 7662 introspection endpoint that tests/introspection.rs runs keygate against.

authlib does the protocol: client authentication, the client-credentials grant that
issues tokens (RFC 6749 4.4), revocation (RFC 7009) and introspection (RFC 7662). This
file only supplies what authlib asks an application for: its clients and its token
store (in memory), and what an introspection answer holds.

    python3 authz_server.py   # binds 127.0.0.1 on a free port and prints it

Clients:
  app, app-short, app-other  get tokens (client_credentials, client_secret_basic);
                             app-short's live 3 s, app-other's are for another audience
  rs-basic                   may introspect, with client_secret_basic only
  rs-post                    may introspect, with client_secret_post only
  rs-bearer                  may introspect, with `Authorization: Bearer rs-bearer-token`

GET /test/introspections answers how many introspection requests came in, so that a
test can count what a cache saved.
"""

import logging
import os
import sys
import threading
import time

# Plain HTTP on loopback: authlib refuses it unless told.
os.environ["AUTHLIB_INSECURE_TRANSPORT"] = "1"

from authlib.common.security import generate_token
from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, TokenMixin, grants
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from flask import Flask, jsonify
from werkzeug.serving import make_server

ISSUER = "https://authz.test"
API = "https://api.test"
# Characters that client_secret_basic must form-encode before joining id and secret.
BASIC_SECRET = "s3cr:t %basic+"
BEARER_TOKEN = "rs-bearer-token"


class Client(ClientMixin):
    def __init__(self, client_id, secret, methods, scope="", lifetime=3600, audience=API, owner="", resource=False):
        self.client_id = client_id
        self.secret = secret
        self.methods = methods
        self.scope = scope
        self.lifetime = lifetime
        self.audience = audience
        self.owner = owner
        self.resource = resource

    def get_client_id(self):
        return self.client_id

    def get_default_redirect_uri(self):
        return None

    def get_allowed_scope(self, scope):
        allowed = set(self.scope.split())
        return " ".join(s for s in scope.split() if s in allowed)

    def check_redirect_uri(self, redirect_uri):
        return False

    def check_client_secret(self, client_secret):
        return client_secret == self.secret

    def check_endpoint_auth_method(self, method, endpoint):
        return method in self.methods

    def check_response_type(self, response_type):
        return False

    def check_grant_type(self, grant_type):
        return grant_type == "client_credentials" and not self.resource


CLIENTS = {
    c.client_id: c
    for c in [
        Client("app", "app-secret", ["client_secret_basic"], "read write reports:export profile", owner="acme"),
        Client("app-short", "app-secret", ["client_secret_basic"], "read", lifetime=3, owner="acme"),
        Client("app-other", "app-secret", ["client_secret_basic"], "read", audience="https://other.test", owner="acme"),
        Client("rs-basic", BASIC_SECRET, ["client_secret_basic"], resource=True),
        Client("rs-post", "rs-post-secret", ["client_secret_post"], resource=True),
        Client("rs-bearer", None, ["resource_bearer"], resource=True),
    ]
}


class Token(TokenMixin):
    def __init__(self, access_token, client, scope, expires_in):
        self.access_token = access_token
        self.client = client
        self.scope = scope
        self.issued_at = int(time.time())
        self.expires_in = expires_in
        self.revoked = False

    def check_client(self, client):
        return client.client_id == self.client.client_id

    def get_scope(self):
        return self.scope

    def get_expires_in(self):
        return self.expires_in

    def is_expired(self):
        return time.time() >= self.issued_at + self.expires_in

    def is_revoked(self):
        return self.revoked


TOKENS = {}
LOCK = threading.Lock()
INTROSPECTIONS = 0


def save_token(token, request):
    with LOCK:
        TOKENS[token["access_token"]] = Token(
            token["access_token"], request.client, token.get("scope", ""), token["expires_in"]
        )


def query_token(token_string):
    with LOCK:
        return TOKENS.get(token_string)


class Introspection(IntrospectionEndpoint):
    CLIENT_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "resource_bearer"]

    def query_token(self, token_string, token_type_hint):
        return query_token(token_string)

    def check_permission(self, token, client, request):
        return client.resource

    def introspect_token(self, token):
        return {
            "active": True,
            "client_id": token.client.client_id,
            "token_type": "Bearer",
            "scope": token.get_scope(),
            "sub": token.client.owner,
            "aud": [token.client.audience, "https://elsewhere.test"],
            "iss": ISSUER,
            "exp": token.issued_at + token.expires_in,
            "iat": token.issued_at,
            "tenant": "t-1",
        }


class Revocation(RevocationEndpoint):
    def query_token(self, token_string, token_type_hint):
        return query_token(token_string)

    def revoke_token(self, token, request):
        token.revoked = True


def authenticate_resource_bearer(query_client, request):
    # A resource server's own bearer token, which RFC 7662 2.1 allows instead of
    # client credentials; authlib has no built-in method for it.
    auth = request.headers.get("Authorization", "")
    if auth == "Bearer " + BEARER_TOKEN:
        return query_client("rs-bearer")
    return None


def main():
    app = Flask(__name__)
    server = AuthorizationServer(app, query_client=CLIENTS.get, save_token=save_token)
    server.register_token_generator(
        "default",
        BearerTokenGenerator(
            lambda client, grant_type, user, scope: generate_token(42),
            expires_generator=lambda client, grant_type: client.lifetime,
        ),
    )
    server.register_grant(grants.ClientCredentialsGrant)
    server.register_client_auth_method("resource_bearer", authenticate_resource_bearer)
    server.register_endpoint(Introspection)
    server.register_endpoint(Revocation)

    @app.post("/oauth/token")
    def issue_token():
        return server.create_token_response()

    @app.post("/oauth/revoke")
    def revoke_token():
        return server.create_endpoint_response("revocation")

    @app.post("/oauth/introspect")
    def introspect():
        global INTROSPECTIONS
        with LOCK:
            INTROSPECTIONS += 1
        return server.create_endpoint_response("introspection")

    @app.get("/test/introspections")
    def introspections():
        with LOCK:
            return jsonify(count=INTROSPECTIONS)

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    http = make_server("127.0.0.1", 0, app, threaded=True)
    print(http.port, flush=True)
    http.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
