// GraphiQL against this query API: queries to /graphql, subscriptions over /graphql/ws. The
// headers pane's headers (e.g. {"Authorization": "Bearer <token>"}) go with every query and,
// since a WebSocket cannot carry them, in the subscription's `connection_init` too.
(function () {
  function endpoint(path, websocket) {
    const url = new URL(path, window.location.href);
    if (websocket) url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    return url.toString();
  }

  // One fetcher for the headers last used: a new token gets a new WebSocket connection (the
  // old one, idle, is closed by its lazy client).
  let current = { key: null, fetcher: null };
  function fetcher(params, options) {
    const headers = (options && options.headers) || {};
    const key = JSON.stringify(headers);
    if (current.key !== key) {
      current = {
        key,
        // Subscriptions through graphql-ws's own client: GraphiQL's build cannot load it.
        fetcher: GraphiQL.createFetcher({
          url: endpoint('/graphql'),
          wsClient: graphqlWs.createClient({
            url: endpoint('/graphql/ws', true),
            connectionParams: headers,
            lazy: true,
          }),
        }),
      };
    }
    return current.fetcher(params, options);
  }

  ReactDOM.createRoot(document.getElementById('graphiql')).render(
    React.createElement(GraphiQL, { fetcher, defaultEditorToolsVisibility: true }),
  );
})();
