# A GraphQL subscriber that is not ours: the `gql` package over its websockets transport,
# speaking graphql-transport-ws. Prints one JSON line per event, flushed at once, so that the
# test reads them as they come:
#   {"data": {...}}                    a result
#   {"errors": [...]}                  a result with errors (the subscription ends)
#   {"closed": code, "reason": "..."}  the server closed the connection
#   {"complete": true}                 the server completed the subscription
# Arguments: url, connection_init payload (JSON), document, variables (JSON), the version
# after which to hang up (0: never), as a client that goes away would, and how many times to
# subscribe at once on the one connection (each result then says which, "subscription": i).
import asyncio
import json
import sys

from gql import Client, gql
from gql.transport.exceptions import TransportQueryError
from gql.transport.websockets import WebsocketsTransport


class Transport(WebsocketsTransport):
    async def _after_connect(self):
        # gql 4.0 looks the negotiated subprotocol up as "Sec-WebSocket-Protocol", case
        # sensitively, and falls back to the Apollo protocol; header names are case-insensitive
        # and hyper sends them in lower case.
        headers = {name.lower(): value for name, value in self.response_headers.items()}
        self.subprotocol = headers.get("sec-websocket-protocol", self.APOLLO_SUBPROTOCOL)


def emit(event):
    print(json.dumps(event), flush=True)


def close_of(error):
    """The close code and reason behind an exception, wherever in its chain they are."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        frame = getattr(error, "rcvd", None)
        if frame is not None:
            return frame.code, frame.reason
        code = getattr(error, "code", None)
        if isinstance(code, int):
            return code, str(error)
        error = error.__cause__ or error.__context__
    return None


async def follow(session, document, variables, hang_up_after, emit_one):
    """One subscription: its results until it completes, or until it reached hang_up_after."""
    try:
        async for result in session.subscribe(gql(document), variable_values=variables):
            emit_one({"data": result})
            versions = [
                value.get("version") for value in result.values() if isinstance(value, dict)
            ]
            if hang_up_after and any(
                version is not None and version >= hang_up_after for version in versions
            ):
                return False
    except TransportQueryError as error:
        emit_one({"errors": error.errors})
        return False
    return True


async def main(url, init_payload, document, variables, hang_up_after, copies):
    transport = Transport(
        url=url,
        init_payload=init_payload,
        subprotocols=[Transport.GRAPHQLWS_SUBPROTOCOL],
        ping_interval=None,
    )
    try:
        async with Client(transport=transport) as session:
            if copies == 1:
                if await follow(session, document, variables, hang_up_after, emit):
                    emit({"complete": True})
                return
            await asyncio.gather(
                *(
                    follow(
                        session,
                        document,
                        variables,
                        hang_up_after,
                        lambda event, i=i: emit({**event, "subscription": i}),
                    )
                    for i in range(copies)
                )
            )
    except Exception as error:  # noqa: BLE001 - every way a connection ends is reported
        close = close_of(error) or close_of(getattr(transport, "close_exception", None))
        if close is None:
            emit({"failed": repr(error)})
        else:
            emit({"closed": close[0], "reason": close[1]})


if __name__ == "__main__":
    asyncio.run(
        main(
            sys.argv[1],
            json.loads(sys.argv[2]),
            sys.argv[3],
            json.loads(sys.argv[4]),
            int(sys.argv[5]),
            int(sys.argv[6]) if len(sys.argv) > 6 else 1,
        )
    )
