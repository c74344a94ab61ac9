// Package stripeevent decodes Stripe events of any API version as far as
// stripe-go v76 can: the root's Stripe verifier decodes a delivery with
// it, and pgstore's inbox worker a stored one, alike.
package stripeevent

import (
	"encoding/json"
	"errors"

	"github.com/stripe/stripe-go/v76"
)

// Decode decodes payload: the whole event, or, when a field of another API
// version does not fit stripe-go's types, the envelope (ID, type, API
// version, creation, mode, account) and the data object as a map and as
// raw JSON. The error is the JSON error of a payload that is not an event
// at all.
func Decode(payload []byte) (*stripe.Event, error) {
	event := new(stripe.Event)
	err := json.Unmarshal(payload, event)
	if err == nil {
		return event, nil
	}
	var typeErr *json.UnmarshalTypeError
	if !errors.As(err, &typeErr) {
		return nil, err
	}
	var envelope struct {
		ID         string          `json:"id"`
		Type       string          `json:"type"`
		APIVersion string          `json:"api_version"`
		Created    int64           `json:"created"`
		Livemode   bool            `json:"livemode"`
		Account    string          `json:"account"`
		Data       json.RawMessage `json:"data"`
	}
	if err := json.Unmarshal(payload, &envelope); err != nil {
		return nil, err
	}
	event = &stripe.Event{
		ID: envelope.ID, Type: stripe.EventType(envelope.Type), APIVersion: envelope.APIVersion,
		Created: envelope.Created, Livemode: envelope.Livemode, Account: envelope.Account,
	}
	if len(envelope.Data) > 0 {
		var data struct {
			Object json.RawMessage `json:"object"`
		}
		if err := json.Unmarshal(envelope.Data, &data); err == nil && len(data.Object) > 0 {
			event.Data = &stripe.EventData{Raw: data.Object}
			_ = json.Unmarshal(data.Object, &event.Data.Object) // a non-object leaves the map nil
		}
	}
	return event, nil
}
