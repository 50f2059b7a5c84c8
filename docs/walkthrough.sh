#!/usr/bin/env bash
# The README's walkthrough, which README.md shows in three parts ("Using the command API",
# "Transfers", "For auditors"), exactly as below this header: query-api's pipeline test
# `walkthrough` checks that, runs this script against a fresh system, and checks every answer
# against the `# =>` line under its request (status, the headers named, the JSON members
# shown; a value with "..." stands for one that differs each run). It needs COMMAND_API,
# QUERY_API and the tenant's tokens TOKEN (teller), VIEW (viewer) and AUD (auditor).
set -euo pipefail

# Open an account (Location: the account on the query API)
OPENED=$(curl -si -X POST "$COMMAND_API/v1/accounts" -H "Authorization: Bearer $TOKEN" \
  -H 'Content-Type: application/json' \
  -d '{"owner":"Ada Lovelace","currency":"EUR","overdraft_limit":0}')
echo "$OPENED"
# => 201 ETag: "1" {"account_id":"0193...","version":1}
ID=$(echo "$OPENED" | grep -o '"account_id":"[^"]*"' | cut -d'"' -f4)

# Deposit 25.00 EUR, safely retryable: the same Idempotency-Key and request again answers the
# same and deposits nothing
curl -si -X POST "$COMMAND_API/v1/accounts/$ID/deposits" -H "Authorization: Bearer $TOKEN" \
  -H 'Content-Type: application/json' -H "Idempotency-Key: deposit-$ID" \
  -d '{"amount":2500,"currency":"EUR"}'
# => 200 ETag: "2" {"version":2}
curl -si -X POST "$COMMAND_API/v1/accounts/$ID/deposits" -H "Authorization: Bearer $TOKEN" \
  -H 'Content-Type: application/json' -H "Idempotency-Key: deposit-$ID" \
  -d '{"amount":2500,"currency":"EUR"}'
# => 200 ETag: "2"; Idempotent-Replayed: true {"version":2}

# Withdraw 10.00 EUR, only if nobody changed the account since version 2
curl -si -X POST "$COMMAND_API/v1/accounts/$ID/withdrawals" -H "Authorization: Bearer $TOKEN" \
  -H 'Content-Type: application/json' -H 'If-Match: "2"' \
  -d '{"amount":1000,"currency":"EUR"}'
# => 200 ETag: "3" {"version":3}
# The instant after the withdrawal, for the auditors' state as of then (GNU date)
AT=$(date -u +%Y-%m-%dT%H:%M:%S.%NZ)
# Version 2 is stale now: 409, with the current version
curl -si -X POST "$COMMAND_API/v1/accounts/$ID/withdrawals" -H "Authorization: Bearer $TOKEN" \
  -H 'Content-Type: application/json' -H 'If-Match: "2"' \
  -d '{"amount":1000,"currency":"EUR"}'
# => 409 ETag: "3" {"type":"urn:ledger:problem:conflict","current_version":3}

# Freeze and unfreeze
curl -si -X POST "$COMMAND_API/v1/accounts/$ID/freeze" -H "Authorization: Bearer $TOKEN"
# => 200 ETag: "4" {"version":4}
curl -si -X POST "$COMMAND_API/v1/accounts/$ID/unfreeze" -H "Authorization: Bearer $TOKEN"
# => 200 ETag: "5" {"version":5}

# Read your write: wait (bounded) until the read model reached the version a command returned
curl -si "$QUERY_API/v1/accounts/$ID?min_version=5" -H "Authorization: Bearer $VIEW"
# => 200 ETag: "5" {"balance":1500,"status":"active","version":5}
# Unchanged since version 5: 304, no body
curl -si "$QUERY_API/v1/accounts/$ID" -H "Authorization: Bearer $VIEW" -H 'If-None-Match: "5"'
# => 304
curl -si "$QUERY_API/v1/accounts?owner=Ada%20Lovelace&status=active&limit=20" \
  -H "Authorization: Bearer $VIEW"
# => 200 {"next_cursor":null}
curl -si "$QUERY_API/v1/accounts/$ID/entries?limit=50" -H "Authorization: Bearer $VIEW"
# => 200 {"next_cursor":null}

# A second account of the tenant, and a transfer of the 15.00 EUR left to it
OPENED=$(curl -si -X POST "$COMMAND_API/v1/accounts" -H "Authorization: Bearer $TOKEN" \
  -H 'Content-Type: application/json' \
  -d '{"owner":"Grace Hopper","currency":"EUR","overdraft_limit":0}')
echo "$OPENED"
# => 201 ETag: "1" {"account_id":"0193...","version":1}
OTHER=$(echo "$OPENED" | grep -o '"account_id":"[^"]*"' | cut -d'"' -f4)
REQUESTED=$(curl -si -X POST "$COMMAND_API/v1/transfers" -H "Authorization: Bearer $TOKEN" \
  -H 'Content-Type: application/json' -H "Idempotency-Key: rent-$ID" \
  -d '{"from_account":"'"$ID"'","to_account":"'"$OTHER"'","amount":1500,"currency":"EUR","reference":"November rent"}')
echo "$REQUESTED"
# => 202 {"transfer_id":"0193...","status_url":"http://127.0.0.1:8081/v1/transfers/0193..."}
TRANSFER=$(echo "$REQUESTED" | grep -o '"transfer_id":"[^"]*"' | cut -d'"' -f4)

# The rest is asynchronous: the transfer is 404 until projected, then requested, debited,
# completed (or rejected, or failed: see below), its versions 1 to 4 (requested, debited,
# credited, completed). Wait for it, at most 10 s
for _ in $(seq 100); do
  curl -s "$QUERY_API/v1/transfers/$TRANSFER" -H "Authorization: Bearer $VIEW" \
    | grep '"status":"completed"' >/dev/null && break
  sleep 0.1
done
curl -si "$QUERY_API/v1/transfers/$TRANSFER" -H "Authorization: Bearer $VIEW"
# => 200 ETag: "4" {"status":"completed","amount":1500,"reference":"November rent","reason":null}
curl -si "$QUERY_API/v1/accounts/$ID/transfers?limit=20" -H "Authorization: Bearer $VIEW"
# => 200 {"next_cursor":null}
# The debit is the source's version 6, the credit the destination's version 2
curl -si "$QUERY_API/v1/accounts/$ID?min_version=6" -H "Authorization: Bearer $VIEW"
# => 200 ETag: "6" {"balance":0,"version":6}
curl -si "$QUERY_API/v1/accounts/$OTHER?min_version=2" -H "Authorization: Bearer $VIEW"
# => 200 ETag: "2" {"balance":1500,"version":2}

# Close: only at a zero balance (else 422 non-zero-balance); closed is for good
curl -si -X POST "$COMMAND_API/v1/accounts/$ID/close" -H "Authorization: Bearer $TOKEN"
# => 200 ETag: "7" {"version":7}
curl -si -X POST "$COMMAND_API/v1/accounts/$OTHER/close" -H "Authorization: Bearer $TOKEN"
# => 422 {"type":"urn:ledger:problem:non-zero-balance"}

# Auditors read the event store itself
curl -si "$QUERY_API/v1/audit/accounts/$ID/events?from_version=1&limit=100" \
  -H "Authorization: Bearer $AUD"
# => 200 {"next_from_version":null}
# The state right after version 3, and as of the instant taken after the withdrawal
curl -si "$QUERY_API/v1/audit/accounts/$ID/state?version=3" -H "Authorization: Bearer $AUD"
# => 200 {"version":3,"balance":1500,"status":"active"}
curl -si "$QUERY_API/v1/audit/accounts/$ID/state?at=$AT" -H "Authorization: Bearer $AUD"
# => 200 {"version":3,"balance":1500,"status":"active"}
# Past the stream's last version (7), or before the account existed: 404 no-state-at
curl -si "$QUERY_API/v1/audit/accounts/$ID/state?version=42" -H "Authorization: Bearer $AUD"
# => 404 {"type":"urn:ledger:problem:no-state-at"}
curl -si "$QUERY_API/v1/audit/accounts/$ID/verify" -H "Authorization: Bearer $AUD"
# => 200 {"intact":true,"events_checked":7,"head_version":7,"first_break":null}
# The tenant's events in commit order; pass next_after back as ?after= for the next page
curl -si "$QUERY_API/v1/audit/log?limit=100" -H "Authorization: Bearer $AUD"
# => 200
